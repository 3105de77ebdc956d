"""Recovery and export of a sliced model.

    windows = pruning.data.token_windows(tokenizer, pruning.data.read_text(source), seq_len)
    domains = [finetune.data.lm_domain("calibration", windows)]             # + task_domain(...) for tasks
    reference = finetune.distill.dense_reference(dense, domains, top_k=32)  # before slicing
    pruning.slicing.slice_model(dense, arch, importance)
    model, result = finetune.recover.recover(dense, domains, RecoveryConfig(distill_weight=0.5),
                                             evaluation=EvalData(eval_windows), reference=reference)
    finetune.hf_writer.export_model(model, arch, tokenizer, out_dir,
                                    ModelCard(budget, command, result.before.to_dict(), result.after.to_dict()))
"""
