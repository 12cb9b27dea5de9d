-- row by row over a row-by-row model
SELECT customer_id, amount, CASE WHEN amount > 100 THEN 'high' ELSE 'low' END AS band
FROM silver.order_lines
