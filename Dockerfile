FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TM_DATA_DIR=/var/lib/trainingmgr \
    TM_PORT=32002

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

# The source tree stays in /app: migrations/ and api/swagger.yaml are read from it at run time.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin trainingmgr \
    && mkdir -p /var/lib/trainingmgr \
    && chown trainingmgr /var/lib/trainingmgr

USER trainingmgr
EXPOSE 32002
VOLUME ["/var/lib/trainingmgr"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TM_PORT', '32002'), timeout=4)" || exit 1

# Migrates the schema, then serves with gunicorn (TM_WORKERS processes).
CMD ["trainingmgr", "serve"]
