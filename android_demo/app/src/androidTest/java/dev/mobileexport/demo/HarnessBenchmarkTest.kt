// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo

import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import dev.mobileexport.demo.harness.BenchmarkHarness
import org.json.JSONObject
import org.junit.Test
import org.junit.runner.RunWith
import java.io.File

/** The device-test runner's harness as an instrumented test (AWS Device Farm runs this APK):
 * `MOBILE_EXPORT_HARNESS_ARGS` = {"argv": [HARNESS.md arguments, `{repetition}` in --output]},
 * `MOBILE_EXPORT_REPETITIONS` = "1,2,3"; each repetition writes its results file into
 * /sdcard/mobile-export-results (Device Farm's customer artifacts). Paths in argv are relative to
 * the folder Device Farm unpacks the EXTERNAL_DATA zip into. */
@RunWith(AndroidJUnit4::class)
class HarnessBenchmarkTest {
    @Test
    fun runHarness() {
        val arguments = InstrumentationRegistry.getArguments()
        val args = JSONObject(env("MOBILE_EXPORT_HARNESS_ARGS") ?: arguments.getString("harness_args") ?: return)
        val argv = args.getJSONArray("argv").let { a -> List(a.length()) { a.getString(it) } }
        fun flag(name: String) = argv[argv.indexOf(name) + 1]
        val base = File(env("DEVICEFARM_EXTERNAL_DATA") ?: "/sdcard")
        val prompt = JSONObject(File(base, flag("--prompt")).readText()).getJSONArray("token_ids")
        val ids = IntArray(prompt.length()) { prompt.getInt(it) }
        val repetitions = (env("MOBILE_EXPORT_REPETITIONS") ?: "1").split(",").map { it.trim().toInt() }
        for (repetition in repetitions) {
            val name = File(flag("--output").replace("{repetition}", repetition.toString())).name
            BenchmarkHarness.run(
                bundleDir = File(base, flag("--bundle")),
                promptIds = ids,
                newTokens = flag("--new-tokens").toInt(),
                warmup = flag("--warmup").toInt(),
                output = File("/sdcard/mobile-export-results", name),
            )
        }
    }

    private fun env(name: String): String? = System.getenv(name)
}
