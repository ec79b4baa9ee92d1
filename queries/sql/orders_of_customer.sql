-- description = "Every order of one customer, newest first."
-- read_models = ["order_summary_by_customer"]
--
-- [params.customer_id]
-- description = "The customer's id (shop.customers.id)."
-- minimum = 1
SELECT *
FROM read_models.order_summary_by_customer
WHERE customer_id = {customer_id:Int64}
ORDER BY created_at DESC, order_id DESC
