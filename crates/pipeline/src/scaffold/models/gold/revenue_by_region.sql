-- Orders and revenue per region and day, from the clean order lines.
SELECT
    region,
    date_trunc('day', ts) AS day,
    count(*) AS orders,
    sum(amount) AS revenue
FROM silver.orders
GROUP BY region, date_trunc('day', ts)
