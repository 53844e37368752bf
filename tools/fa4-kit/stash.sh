# The FA4 kit's first call on the GPU machine: keep part one under /tmp for the next call.
mkdir -p /tmp/fa4-parts && cp "$(dirname "${BASH_SOURCE[0]}")"/site.tar.xz.* /tmp/fa4-parts/ && ls -la /tmp/fa4-parts
