-- description = "The customers with the highest lifetime value (revenue of their orders, cancelled ones excluded)."
-- read_models = ["customer_ranking"]
--
-- [params.top]
-- description = "How many customers."
-- default = 10
-- minimum = 1
-- maximum = 1000
SELECT customer_id, name, orders, revenue
FROM read_models.customer_ranking
ORDER BY -revenue, customer_id
LIMIT {top:UInt32}
