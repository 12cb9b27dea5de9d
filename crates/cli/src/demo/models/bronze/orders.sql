-- Every order event as it arrived, typed: redelivered copies included.
SELECT order_id, customer_id, product_id, region, quantity, unit_price, ts
FROM orders
