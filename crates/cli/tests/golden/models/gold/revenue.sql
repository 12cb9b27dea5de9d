-- GROUP BY over deduplicated rows (a model over a model)
SELECT region, count(*) AS orders, sum(quantity * unit_price) AS revenue
FROM silver.orders
GROUP BY region
