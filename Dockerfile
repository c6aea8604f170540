# The one image every manifest under k8s/ runs: Ray's own image, pinned to the Ray
# of constraints.txt (2.60.0, Python 3.11), plus this project and the MLflow server's
# database/object-store drivers. Build from the repository root:
#   CPU: docker build -t REGISTRY/insight:ray2.60.0-py311 .
#   GPU: docker build --build-arg VARIANT=-gpu -t REGISTRY/insight:ray2.60.0-py311-gpu .
# The tag carries the Ray version on purpose: head, workers and the client that
# submits jobs must run the same Ray (tests/test_k8s_manifests.py checks it).
ARG VARIANT=""
FROM rayproject/ray:2.60.0-py311${VARIANT}

# Extra package index for torch wheels of a specific CUDA build, if wanted; PyPI's default
# torch wheels already carry CUDA.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    INSIGHT_PROJECT_ROOT=/home/ray/insight \
    PYTHONPATH=/home/ray/insight
WORKDIR /home/ray/insight

# 1. Dependencies only (a cached layer that survives code changes): the metadata and pins
#    with an empty package, installed with the same constraints as the dev environment.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
RUN mkdir -p platform/insight && touch platform/insight/__init__.py \
 && pip install -c constraints.txt . "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
 && python -c "import ray, sys; assert ray.__version__ == '2.60.0', ray.__version__"

# 2. The project itself: the package, the job entrypoints (jobs/), configs and the serve app
#    (serve.app:build_app, importable from any Ray worker through PYTHONPATH: a RayService's
#    Serve controller imports it by name).
COPY --chown=ray:users . .
RUN pip install --no-deps --force-reinstall . \
 && python -c "import insight.cli, insight.cluster" \
 && test -f jobs/extract.py \
 && cd / && python -c "import serve.app"
