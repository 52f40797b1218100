// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.harness

import android.os.SystemClock
import dev.mobileexport.demo.bundle.BundleFiles
import dev.mobileexport.demo.runtime.LanguageModelRuntime
import dev.mobileexport.demo.runtime.openRuntime
import org.json.JSONArray
import org.json.JSONObject
import java.io.File

/** The results file of one measurement. Every key goes through [put] with a literal name, so a
 * test of this project (tests/test_demo_apps.py) checks the set against device_tests/HARNESS.md. */
class ResultsRecord {
    val json = JSONObject()
    fun put(key: String, value: Any?): ResultsRecord = apply { json.put(key, value ?: JSONObject.NULL) }
}

/** device_tests/HARNESS.md (version 1) on the phone: load, warm up, one timed greedy generation
 * (EOS does not stop it), peak memory, reference.json teacher-forced, the results file. */
object BenchmarkHarness {
    const val NAME = "mobile-export-android-app-harness"

    fun run(bundleDir: File, promptIds: IntArray, newTokens: Int, warmup: Int, output: File) {
        val record = ResultsRecord()
        record.put("harness_schema_version", 1)
        record.put("harness", JSONObject().put("name", NAME).put("version", "1"))
        try {
            val bundle = BundleFiles(bundleDir)
            openRuntime(bundle).use { runtime ->
                record.put("runtime", JSONObject().put("name", runtime.name).put("version", "android"))
                measure(bundle, runtime, promptIds, newTokens, warmup, record)
            }
        } catch (error: Throwable) {
            record.put("status", "failed")
            record.put("error", (error.message ?: error.toString()).lines().first())
            if (!record.json.has("runtime")) record.put("runtime", JSONObject().put("name", "unknown").put("version", "unknown"))
        }
        output.parentFile?.mkdirs()
        val staging = File(output.path + ".tmp")
        staging.writeText(record.json.toString())
        check(staging.renameTo(output)) { "cannot rename into $output" }
    }

    private fun measure(bundle: BundleFiles, runtime: LanguageModelRuntime, prompt: IntArray, newTokens: Int, warmup: Int, record: ResultsRecord) {
        require(prompt.size + newTokens <= bundle.contextLength) { "prompt + new tokens exceed the model's context of ${bundle.contextLength}" }
        val rssBefore = procStatusBytes("VmRSS")
        var start = SystemClock.elapsedRealtimeNanos()
        runtime.load()
        val loadS = seconds(start)
        repeat(warmup) { generate(runtime, prompt, newTokens) }
        val (prefillS, decodeS) = generate(runtime, prompt, newTokens)
        val peak = procStatusBytes("VmHWM")
        val outputs = bundle.reference?.let { runReference(runtime, it) }
        record.put("status", "ok")
        record.put("error", null)
        record.put("bundle_manifest_sha256", bundle.manifestSha256)
        record.put("prompt_tokens", prompt.size)
        record.put("generated_tokens", newTokens)
        record.put("load_s", loadS)
        record.put("ttft_s", prefillS)
        record.put("prefill_s", prefillS)
        record.put("decode_s", decodeS)
        record.put("prefill_tokens_per_s", prompt.size / prefillS)
        record.put("decode_tokens_per_s", if (newTokens > 1) (newTokens - 1) / decodeS else 0.0)
        record.put("peak_memory_bytes", peak)
        record.put("memory_source", "VmHWM (/proc/self/status)")
        record.put("rss_before_load_bytes", rssBefore)
        record.put("reference_outputs", outputs?.let { list ->
            JSONArray(list.map { out ->
                JSONObject().put("tokens", JSONArray(out.tokens))
                    .put("logprobs", out.logprobs?.let { lp -> JSONArray(lp.map(::JSONArray)) } ?: JSONObject.NULL)
            })
        })
    }

    private fun generate(runtime: LanguageModelRuntime, prompt: IntArray, newTokens: Int): Pair<Double, Double> {
        var start = SystemClock.elapsedRealtimeNanos()
        var token = runtime.step(prompt, 0).token
        val prefillS = seconds(start)
        start = SystemClock.elapsedRealtimeNanos()
        for (i in 1 until newTokens) token = runtime.step(intArrayOf(token), prompt.size + i - 1).token
        return prefillS to seconds(start)
    }

    private fun seconds(startNanos: Long) = (SystemClock.elapsedRealtimeNanos() - startNanos) / 1e9

    private fun procStatusBytes(field: String): Long =
        File("/proc/self/status").readLines().firstOrNull { it.startsWith("$field:") }
            ?.substringAfter(':')?.trim()?.substringBefore(' ')?.toLongOrNull()?.times(1024) ?: -1
}
