# The Tally processes (engine workers, sinks, ingress) for machines WITH a Docker engine:
# `docker compose --profile app up -d --scale worker=3` (see README, "Scaling out").
# CI and the build machines have no Docker engine; there the same processes run from the
# virtualenv (`make demo`, `tally engine`), which is what the tests exercise.
FROM python:3.11-slim

WORKDIR /app
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN for p in core topics streams sinks notify ingress audit importer replay harness bench tally; do mkdir -p $p && touch $p/__init__.py; done \
    && pip install --no-cache-dir -e . \
    && rm -rf core topics streams sinks notify ingress audit importer replay harness bench tally
COPY core core
COPY topics topics
COPY streams streams
COPY sinks sinks
COPY notify notify
COPY ingress ingress
COPY audit audit
COPY importer importer
COPY replay replay
COPY harness harness
COPY bench bench
COPY tally tally
COPY migrations migrations
# Editable: the package finds migrations/ beside it, as in a checkout.
RUN pip install --no-cache-dir --no-deps -e .

RUN useradd --create-home --uid 1000 tally && mkdir -p /var/lib/tally && chown tally /var/lib/tally
USER tally
ENV TALLY_DATA_DIR=/var/lib/tally/engine
ENTRYPOINT ["tally"]
