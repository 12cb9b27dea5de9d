-- GROUP BY: count, sum, min, max, avg
SELECT customer_id, count(*) AS orders, sum(quantity) AS items,
       min(unit_price) AS cheapest, max(unit_price) AS dearest, avg(unit_price) AS mean_price
FROM orders
GROUP BY customer_id
