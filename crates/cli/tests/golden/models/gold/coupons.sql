-- aggregate FILTER
SELECT region, count(*) FILTER (WHERE coupon IS NOT NULL) AS with_coupon, count(*) AS all_orders
FROM orders
GROUP BY region
