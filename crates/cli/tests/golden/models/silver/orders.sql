-- deduplication: the earliest copy of each order
SELECT order_id, customer_id, product_id, region, quantity, unit_price, ts
FROM (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn FROM orders
)
WHERE rn = 1
