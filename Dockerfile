FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY client client
COPY server server
COPY dashboard dashboard
COPY migrations migrations
RUN pip install --no-cache-dir '.[server]'
EXPOSE 8765
# `stethoscope db upgrade` is also applied by `stethoscope server` on start; done first here so a
# failed migration stops the container before it serves.
CMD ["sh", "-c", "stethoscope db upgrade && stethoscope server --host 0.0.0.0 --port 8765"]
