-- description = "The best-selling products by revenue (cancelled orders excluded)."
-- read_models = ["product_ranking"]
--
-- [params.top]
-- description = "How many products."
-- default = 10
-- minimum = 1
-- maximum = 1000
SELECT product_id, name, units, revenue
FROM read_models.product_ranking
ORDER BY -revenue, product_id
LIMIT {top:UInt32}
