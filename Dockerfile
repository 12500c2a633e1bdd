# Scopegate gateway image. Configuration comes from the environment (SCOPEGATE_<SECTION>__<KEY>)
# and the upstream credential from FLY_API_TOKEN (or upstream.token_file on a mounted secret).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --system --gid 10001 scopegate \
    && useradd --system --uid 10001 --gid scopegate --home-dir /var/lib/scopegate --create-home --shell /usr/sbin/nologin scopegate

COPY pyproject.toml README.md ./
# gateway/policies links to policies/: the shipped policies and route maps are installed as package
# data, so the defaults need no path settings. Mount your own and set SCOPEGATE_POLICY__POLICY etc.
COPY gateway ./gateway
COPY policies ./policies
RUN pip install --no-cache-dir . && rm -rf /root/.cache

# The keyring variable holds a path, not key material: the keys live on the volume.
# hadolint ignore=DL3064
ENV SCOPEGATE_SERVER__HOST=0.0.0.0 \
    SCOPEGATE_SERVER__PORT=8080 \
    SCOPEGATE_STORE__URL=sqlite:////var/lib/scopegate/state.db \
    SCOPEGATE_TOKENS__KEYRING=/var/lib/scopegate/keyring.json \
    SCOPEGATE_AUDIT__SINKS='["stdout"]'

USER 10001:10001
VOLUME ["/var/lib/scopegate"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/_gateway/healthz', timeout=2)"]
ENTRYPOINT ["scopegate"]
CMD ["serve"]
