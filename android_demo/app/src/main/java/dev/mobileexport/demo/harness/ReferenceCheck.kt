// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.harness

import dev.mobileexport.demo.bundle.BundleJson
import dev.mobileexport.demo.runtime.LanguageModelRuntime
import org.json.JSONArray
import org.json.JSONObject
import kotlin.math.abs
import kotlin.math.exp
import kotlin.math.ln

/** One prompt of reference.json run teacher-forced: the runtime's argmax and the log-softmax of
 * each step's reference top ids (device_tests/HARNESS.md, "Reference parity"). */
data class PromptOutput(val tokens: List<Int>, val logprobs: List<List<Double>>?)

/** The bundle's reference.json on [runtime]: prefill token_ids at 0, then feed greedy_tokens. */
fun runReference(runtime: LanguageModelRuntime, reference: BundleJson): List<PromptOutput> {
    val prompts = reference.path("prompts") as JSONArray
    return List(prompts.length()) { p ->
        val prompt = prompts.getJSONObject(p)
        val ids = prompt.getJSONArray("token_ids").let { a -> IntArray(a.length()) { a.getInt(it) } }
        val greedy = prompt.getJSONArray("greedy_tokens")
        val steps = prompt.getJSONArray("steps")
        val tokens = mutableListOf<Int>()
        val logprobs = mutableListOf<List<Double>>()
        var exposesLogits = true
        var position = ids.size
        for (i in 0 until steps.length()) {
            val step = if (i == 0) runtime.step(ids, 0) else runtime.step(intArrayOf(greedy.getInt(i - 1)), position++)
            tokens += step.token
            val row = step.logits
            if (row == null) {
                exposesLogits = false
                continue
            }
            val lp = logSoftmax(row)
            val top = steps.getJSONObject(i).getJSONArray("top_ids")
            logprobs += List(top.length()) { Math.round(lp[top.getInt(it)] * 1e5) / 1e5 }
        }
        PromptOutput(tokens, if (exposesLogits) logprobs else null)
    }
}

/** The check mobile-export runs on the host (mobile_export/reference.py: check_outputs), for the
 * app's own pass/fail line; the device-test runner re-checks the harness's outputs itself. */
fun referencePasses(reference: BundleJson, outputs: List<PromptOutput>): Pair<Boolean, String> {
    val minAgreement = reference.double("thresholds.min_top1_agreement") ?: 0.0
    val maxDiff = reference.double("thresholds.max_abs_logprob_diff")
    val maxMean = reference.double("thresholds.max_mean_abs_logprob_diff")
    val tie = reference.double("thresholds.tie_margin") ?: 0.0
    val prompts = reference.path("prompts") as JSONArray
    var worst = 1.0
    for ((p, out) in outputs.withIndex()) {
        val steps = prompts.getJSONObject(p).getJSONArray("steps")
        var agree = 0
        val diffs = mutableListOf<Double>()
        for (i in 0 until steps.length()) {
            val step: JSONObject = steps.getJSONObject(i)
            val ids = step.getJSONArray("top_ids")
            val lps = step.getJSONArray("top_logprobs")
            val near = (0 until ids.length()).filter { lps.getDouble(0) - lps.getDouble(it) <= tie }.map { ids.getInt(it) }
            if (out.tokens[i] in near) agree++
            out.logprobs?.let { lp -> for (j in 0 until ids.length()) diffs += abs(lp[i][j] - lps.getDouble(j)) }
        }
        val agreement = agree.toDouble() / steps.length()
        worst = minOf(worst, agreement)
        if (agreement < minAgreement) return false to "prompt $p: greedy agreement ${"%.0f".format(agreement * 100)}%"
        if (diffs.isEmpty()) continue  // tokens only: the runtime exposes no logits
        if (maxDiff != null && diffs.max() > maxDiff) return false to "prompt $p: max |log-prob diff| ${diffs.max()}"
        if (maxMean != null && diffs.average() > maxMean) return false to "prompt $p: mean |log-prob diff| ${diffs.average()}"
    }
    return true to "greedy agreement >= ${"%.0f".format(worst * 100)}% on ${outputs.size} prompts"
}

private fun logSoftmax(row: FloatArray): DoubleArray {
    val best = row.max().toDouble()
    val logTotal = ln(row.sumOf { exp(it - best) }) + best
    return DoubleArray(row.size) { row[it] - logTotal }
}
