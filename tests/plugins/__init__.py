"""Test plugins: importable from trial processes through a spec's `plugins:` list."""
