-- One row per order: the first event of each order_id; the line's net amount.
SELECT order_id, customer_id, product_id, region, quantity, unit_price,
       quantity * unit_price AS amount, ts
FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn
    FROM orders
)
WHERE rn = 1
