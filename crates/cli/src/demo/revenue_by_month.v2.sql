-- Net revenue and VAT per month. v2: the prices are net, so the tax is the rate times the
-- amount.
SELECT
    date_trunc('month', o.ts) AS month,
    count(*) AS orders,
    sum(o.amount) AS revenue,
    sum(o.amount * p.tax_rate) AS tax
FROM silver.orders o
JOIN products p ON o.product_id = p.product_id
GROUP BY date_trunc('month', o.ts)
