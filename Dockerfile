# mailgw: the help-desk gateway in one container.
#
#   docker build -t mailgw .
#   docker run -d -p 2525:2525 -v mailgw-data:/data mailgw
#
# The home (config/ filters/ templates/ store/) lives in the /data volume; on first start it
# is filled from the defaults shipped inside the wheel. Edit /data/config/mailgw.yaml and
# restart to configure. tests/test_dockerfile.py replays these steps without Docker, so keep
# the pip install in its own RUN step and the start command in CMD.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from (see [tool.hatch.build] in pyproject.toml).
WORKDIR /app
COPY pyproject.toml README.md /app/
COPY mailgw/ /app/mailgw/
COPY config/ /app/config/
COPY templates/ /app/templates/
COPY filters/ /app/filters/

# A real (non-editable) install: the wheel carries config/templates/filters under
# mailgw/_defaults, which is where `mailgw init` copies them from.
RUN pip install --no-cache-dir /app

# An unprivileged user owning the data directory; VOLUME below keeps that ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home mailgw \
    && mkdir -p /data \
    && chown mailgw:mailgw /data

ENV MAILGW_HOME=/data
VOLUME /data
WORKDIR /data
USER mailgw
EXPOSE 2525

# Healthy while the SMTP listener accepts connections.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 2525), timeout=3).close()"]

# Add whatever the home is missing (never overwrites), then hand PID 1 to the gateway with
# `exec` so that `docker stop` (SIGTERM) reaches it and it shuts down cleanly.
CMD ["sh", "-c", "mailgw init /data --exist-ok && exec mailgw run --smtp 0.0.0.0:2525"]
