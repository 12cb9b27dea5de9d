//! The order models run in: every model after the models it reads.

use std::collections::BTreeMap;

/// Model ids (each with the ids of the models it reads) in dependency order, or one cycle (as
/// a path of ids back to its start).
pub fn order(models: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        id: &str,
        models: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(id) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| p == id).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(id.to_owned());
                return Err(cycle);
            }
            None => {}
        }
        marks.insert(id.to_owned(), Mark::Visiting);
        path.push(id.to_owned());
        if let Some(upstream) = models.get(id) {
            for upstream in upstream {
                visit(upstream, models, marks, path, order)?;
            }
        }
        path.pop();
        marks.insert(id.to_owned(), Mark::Done);
        order.push(id.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::with_capacity(models.len());
    for id in models.keys() {
        visit(id, models, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}
