-- projection, arithmetic, filter
SELECT order_id, customer_id, region, quantity * unit_price AS amount, ts
FROM orders
WHERE quantity > 0
