-- HAVING: a group appears, and can only grow past the threshold
SELECT customer_id, sum(quantity * unit_price) AS spent
FROM orders
GROUP BY customer_id
HAVING sum(quantity * unit_price) > 4400
