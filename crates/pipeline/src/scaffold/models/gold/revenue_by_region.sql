-- Revenue per region and day, tax included, from the clean orders and the product catalogue.
SELECT
    o.region,
    date_trunc('day', o.ts) AS day,
    sum(o.quantity * o.unit_price * (1 + p.tax_rate)) AS revenue
FROM silver.orders o
JOIN products p ON o.product_id = p.product_id
GROUP BY o.region, date_trunc('day', o.ts)
