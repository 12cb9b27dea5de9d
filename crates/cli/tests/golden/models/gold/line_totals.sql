-- GROUP BY over a row-by-row model
SELECT region, sum(amount) AS total, count(*) AS lines
FROM silver.order_lines
GROUP BY region
