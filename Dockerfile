FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config config
COPY streams streams
COPY learners learners
COPY producers producers
COPY loopwise loopwise
RUN pip install --no-cache-dir . && mkdir -p /app/state && chown nobody /app/state
USER nobody
CMD ["loopwise", "worker"]
