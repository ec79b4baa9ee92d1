-- description = "One order: its customer, lines, units, total, status, timestamps and product names."
-- read_models = ["order_summary"]
--
-- [params.order_id]
-- description = "The order's id (shop.orders.id)."
-- minimum = 1
SELECT *
FROM read_models.order_summary
WHERE order_id = {order_id:Int64}
