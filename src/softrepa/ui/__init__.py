"""`softrepa ui`: a local web page comparing vanilla and soft tokens, for generation and FlowEdit.

`jobs` holds the work (library calls, input checks, one job at a time) and imports no gradio;
`app` builds the gradio page and serves it (the optional extra: `pip install 'softrepa[ui]'`).
Nothing here is imported by the rest of softrepa.
"""
