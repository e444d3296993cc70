# Terrazzo service image: multi-stage, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY core ./core
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 terrazzo
USER terrazzo
WORKDIR /home/terrazzo
ENV PATH=/opt/venv/bin:$PATH \
    TERRAZZO_HOST=0.0.0.0 \
    TERRAZZO_PORT=8000
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["sh", "-c", "test -f \"${TERRAZZO_CATALOG:-}\" || { terrazzo demo -o data/demo && export TERRAZZO_CATALOG=data/demo/items.parquet; }; exec terrazzo serve"]
