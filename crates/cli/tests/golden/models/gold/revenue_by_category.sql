-- deduplicated stream LEFT JOIN dimension, then GROUP BY
SELECT coalesce(p.category, 'unknown') AS category, count(*) AS orders,
       sum(o.quantity * o.unit_price) AS revenue
FROM silver.orders o
LEFT JOIN products p ON o.product_id = p.product_id
GROUP BY coalesce(p.category, 'unknown')
