-- Revenue and tax per product category and day. Each order looks its product up in the
-- `products` topic, a table (kind = "table"): the latest record per product_id.
SELECT
    p.category,
    date_trunc('day', o.ts) AS day,
    count(*) AS orders,
    sum(o.amount) AS revenue,
    sum(o.amount * p.tax_rate) AS tax
FROM silver.orders o
JOIN products p ON o.product_id = p.product_id
GROUP BY p.category, date_trunc('day', o.ts)
