-- anti join: orders whose product is not in the catalogue
SELECT o.order_id, o.product_id
FROM orders o
LEFT ANTI JOIN products p ON o.product_id = p.product_id
