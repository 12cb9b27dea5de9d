-- window by date_trunc, per key
SELECT date_trunc('minute', ts) AS minute, customer_id, count(*) AS orders
FROM orders
GROUP BY date_trunc('minute', ts), customer_id
