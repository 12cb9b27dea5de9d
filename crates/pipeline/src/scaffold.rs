//! The example project `kappa init` writes: a shop's orders and products, cleaned in silver,
//! summed into revenue per region and day, and per product category (looked up in the
//! products table) and day, in gold.

/// Every file of the example project: path relative to the project folder, and contents.
pub const FILES: &[(&str, &str)] = &[
    ("kappa.toml", include_str!("scaffold/kappa.toml")),
    ("README.md", include_str!("scaffold/README.md")),
    (".gitignore", include_str!("scaffold/gitignore")),
    (
        "topics/orders.toml",
        include_str!("scaffold/topics/orders.toml"),
    ),
    (
        "topics/products.toml",
        include_str!("scaffold/topics/products.toml"),
    ),
    (
        "models/silver/orders.sql",
        include_str!("scaffold/models/silver/orders.sql"),
    ),
    (
        "models/silver/orders.toml",
        include_str!("scaffold/models/silver/orders.toml"),
    ),
    (
        "models/gold/revenue_by_region.sql",
        include_str!("scaffold/models/gold/revenue_by_region.sql"),
    ),
    (
        "models/gold/revenue_by_region.toml",
        include_str!("scaffold/models/gold/revenue_by_region.toml"),
    ),
    (
        "models/gold/revenue_by_category.sql",
        include_str!("scaffold/models/gold/revenue_by_category.sql"),
    ),
    (
        "data/orders.ndjson",
        include_str!("scaffold/data/orders.ndjson"),
    ),
    (
        "data/products.ndjson",
        include_str!("scaffold/data/products.ndjson"),
    ),
];

#[cfg(test)]
mod tests {
    use super::FILES;
    use crate::{ProjectFiles, load};

    #[test]
    fn the_example_project_checks_clean() {
        let files: ProjectFiles = FILES
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect();
        let project = load(&files).unwrap_or_else(|d| panic!("{d:#?}"));
        assert_eq!(
            project.order,
            vec![
                "silver.orders",
                "gold.revenue_by_category",
                "gold.revenue_by_region"
            ]
        );
        assert_eq!(project.topics["orders"].fields.len(), 8);
    }
}
