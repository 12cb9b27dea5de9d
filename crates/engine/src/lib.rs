//! kappa's stream processor (being built): plans each model with DataFusion against the schemas
//! of the topics and models it reads.

pub mod aggregate;
pub mod check;
pub mod decode;
pub mod dedup;
pub mod dimension;
pub mod functions;
pub mod grouped;
pub mod plan;
pub mod runner;
pub mod schema;
pub mod stateless;
pub mod watermark;
pub mod windowed;
