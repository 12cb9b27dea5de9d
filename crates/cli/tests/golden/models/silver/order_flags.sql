-- CASE, casts, scalar functions, NULL handling
SELECT order_id,
       CASE WHEN quantity >= 3 THEN 'bulk' WHEN quantity > 0 THEN 'single' ELSE 'empty' END AS size,
       upper(coalesce(region, 'none')) AS region,
       CAST(unit_price AS DOUBLE) AS price,
       date_trunc('hour', ts) AS hour,
       coupon IS NOT NULL AS has_coupon,
       length(customer_id) AS customer_len
FROM orders
