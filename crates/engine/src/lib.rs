//! kappa's stream processor (being built): plans each model with DataFusion against the schemas
//! of the topics and models it reads.

pub mod aggregate;
pub mod bronze;
pub mod check;
pub mod commit_audit;
pub mod commit_record;
pub mod decode;
pub mod dedup;
pub mod dedup_shape;
pub mod deltas;
pub mod dimension;
pub mod error;
pub mod event_log;
pub mod expect;
pub mod functions;
pub mod grouped;
mod in_step;
mod kafka_topic;
pub mod lookup;
pub mod mask;
pub mod mask_plan;
pub mod metrics;
pub mod operator;
pub mod plan;
pub mod plan_tables;
pub mod refresh;
pub mod runner;
pub mod scd;
pub mod schema;
mod source;
pub mod stateless;
pub mod stream_join;
pub mod tables;
pub mod topic_source;
pub mod upstream;
pub mod watermark;
pub mod windowed;
