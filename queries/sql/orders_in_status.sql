-- description = "The orders currently in one status, newest first."
-- read_models = ["order_summary_by_status"]
--
-- [params.status]
-- description = "An order status."
-- choices = ["PENDING", "CONFIRMED", "SHIPPED", "DELIVERED", "CANCELLED"]
SELECT *
FROM read_models.order_summary_by_status
WHERE status = {status:String}
ORDER BY created_at DESC, order_id DESC
