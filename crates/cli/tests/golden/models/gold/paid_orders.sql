-- stream ⋈ stream within a time bound
SELECT o.order_id, o.customer_id, p.payment_id, p.amount, p.ts AS paid_at
FROM orders o
JOIN payments p
  ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 minute'
