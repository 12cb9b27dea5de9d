-- One clean row per order: the earliest event of each order_id wins, redelivered copies are
-- dropped, and empty orders are left out.
SELECT
    order_id,
    customer_id,
    product_id,
    region,
    quantity,
    unit_price,
    quantity * unit_price AS amount,
    ts
FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn
    FROM orders
)
WHERE rn = 1 AND quantity > 0
