-- count(DISTINCT …), a NULL group
SELECT region, count(DISTINCT product_id) AS products
FROM orders
GROUP BY region
