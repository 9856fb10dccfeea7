"""Write the default suite with only its throughput_blocks check (the speed column at llama.cpp's bytes)
to the path given: python benchmarks/oneoff/blocks_suite.py /tmp/blocks.toml (a one-off for a short GPU call)."""
import re,sys
s=open("suites/kv_dtype.toml").read()
head=s[:s.index("[[check]]")]
blk=s[s.index('name = "throughput_blocks"'):]
blk="[[check]]\nkind = \"throughput\"\n"+blk.split("[[check]]")[0]
open(sys.argv[1],"w").write(head.replace('name = "kv-dtype"','name = "speed-blocks"')+blk)
