-- stream ⋈ dimension, row by row
SELECT o.order_id, p.category, o.quantity * o.unit_price * p.tax_rate AS tax
FROM orders o
JOIN products p ON o.product_id = p.product_id
