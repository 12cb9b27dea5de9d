-- Net revenue and VAT per month. v1: takes the shop's prices as gross and extracts the tax
-- from them, but the prices are net: the tax is under-reported.
SELECT
    date_trunc('month', o.ts) AS month,
    count(*) AS orders,
    sum(o.amount) AS revenue,
    sum(o.amount * p.tax_rate / (1 + p.tax_rate)) AS tax
FROM silver.orders o
JOIN products p ON o.product_id = p.product_id
GROUP BY date_trunc('month', o.ts)
