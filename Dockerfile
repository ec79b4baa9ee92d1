# The projector image: `projector run`, `projector serve` and `projector connectors apply`
# (docker-compose.yml picks the command per service; tests/unit/test_compose.py checks each
# exists). No entrypoint.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md* ./
COPY projector/ projector/
COPY connectors/ connectors/
COPY schemas/ schemas/
COPY queries/ queries/
COPY devstack/ devstack/
RUN pip install . && useradd --system --uid 10001 --create-home projector

USER projector
CMD ["projector", "--help"]
