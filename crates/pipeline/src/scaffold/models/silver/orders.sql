-- Clean order lines: the amount computed once, empty orders dropped.
SELECT
    order_id,
    customer_id,
    product_id,
    region,
    quantity,
    unit_price,
    quantity * unit_price AS amount,
    ts
FROM orders
WHERE quantity > 0
