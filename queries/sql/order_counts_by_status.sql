-- description = "How many orders are in each status now."
-- read_models = ["orders_by_status"]
SELECT status, orders
FROM read_models.orders_by_status
ORDER BY status
