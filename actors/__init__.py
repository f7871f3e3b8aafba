"""Ray stage actors for the pruning pipeline.

`actors.stage.Stage` wraps `pipeline.calibrate.SliceRunner` for a contiguous slice of decoder layers;
`actors.driver.run_distributed` places K stages, streams activations between them and finishes the
output. Neither holds solver or model code: that lives in `pipeline/`.
"""
