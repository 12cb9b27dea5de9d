//! A dimension as the planner sees it: its current rows as a table of their own type
//! ([`DimensionTable`]), so that shape detection can tell a lookup of a stream in dimensions
//! from a join of two streams. `dimension.rs` keeps each one current.

use std::any::Any;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::{MemTable, TableProvider, TableType, source_as_provider};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, Join, JoinType, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;

/// The current rows of a dimension, as a DataFusion table. Its own type, so that a plan can
/// tell a dimension's scan from the stream's.
#[derive(Debug)]
pub struct DimensionTable {
    rows: MemTable,
}

impl DimensionTable {
    pub fn new(schema: SchemaRef) -> Result<DimensionTable> {
        Ok(DimensionTable {
            rows: MemTable::try_new(schema, vec![vec![]])?,
        })
    }

    /// The schema of its rows.
    pub(crate) fn schema_ref(&self) -> SchemaRef {
        self.rows.schema()
    }

    /// Replaces the rows.
    pub(crate) async fn set(&self, batch: RecordBatch) {
        *self.rows.batches[0].write().await = vec![batch];
    }
}

#[async_trait::async_trait]
impl TableProvider for DimensionTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.rows.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.rows.scan(state, projection, filters, limit).await
    }
}

/// Whether every table `plan` reads is a dimension (and it reads at least one).
pub fn reads_only_dimensions(plan: &LogicalPlan) -> bool {
    let mut dimensions = 0;
    let mut others = 0;
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if source_as_provider(&scan.source)
                .is_ok_and(|p| p.as_any().downcast_ref::<DimensionTable>().is_some())
            {
                dimensions += 1;
            } else {
                others += 1;
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    dimensions > 0 && others == 0
}

/// Why a join is not a lookup of a stream in dimensions, with the nearest form that is;
/// `None` if it is one.
pub fn lookup_join_problem(join: &Join) -> Option<String> {
    let left_dimension = reads_only_dimensions(&join.left);
    let right_dimension = reads_only_dimensions(&join.right);
    let stream_kept = match (left_dimension, right_dimension) {
        (true, true) => {
            return Some(
                "this join reads only tables (topics of kind \"table\"); join them to a stream, \
                 which drives the lookups"
                    .into(),
            );
        }
        (false, false) => {
            return Some(
                "both sides of this join read streams; two streams join only as one join of \
                 two different topics with a time bound in ON (p.ts BETWEEN o.ts AND o.ts + \
                 INTERVAL '1 hour'); or declare the side that holds the current state of \
                 something (products, customers) as kind = \"table\" in its \
                 topics/<name>.toml, and it becomes a dimension looked up by each event"
                    .into(),
            );
        }
        (false, true) => matches!(
            join.join_type,
            JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti
        ),
        (true, false) => matches!(
            join.join_type,
            JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti
        ),
    };
    (!stream_kept).then(|| {
        format!(
            "a {} join would produce rows of the dimension that no event looked up; use JOIN \
             or LEFT JOIN from the stream to the dimension",
            join.join_type.to_string().to_lowercase()
        )
    })
}
