// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.ui

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import dev.mobileexport.demo.bundle.BundleFiles
import dev.mobileexport.demo.harness.referencePasses
import dev.mobileexport.demo.harness.runReference
import dev.mobileexport.demo.runtime.openRuntime
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File

/** Pick a bundle (a folder pushed to the app's files, e.g. `adb push dist/demo-android
 * /sdcard/Android/data/dev.mobileexport.demo/files/bundles/`), show its manifest facts, run its
 * reference.json check, then chat with streaming text and tokens/s. */
class ChatActivity : AppCompatActivity() {
    private lateinit var log: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val input = EditText(this).apply { hint = "Message" }
        val send = Button(this).apply { text = "Send" }
        log = TextView(this)
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(ScrollView(context).apply { addView(log) }, LinearLayout.LayoutParams(-1, 0, 1f))
            addView(input)
            addView(send)
        })
        val folder = File(getExternalFilesDir(null), "bundles").listFiles()?.firstOrNull { File(it, "manifest.json").isFile }
        if (folder == null) {
            log.text = "Push a bundle folder into ${getExternalFilesDir(null)}/bundles/ and restart."
            return
        }
        val bundle = BundleFiles(folder)
        log.text = "${folder.name}: ${bundle.backend}, ${bundle.scheme}, context ${bundle.contextLength}\n"
        lifecycleScope.launch { checkReference(bundle) }
        send.setOnClickListener {
            val text = input.text.toString().also { input.setText("") }
            lifecycleScope.launch { reply(bundle, text) }
        }
    }

    /** The bundle's own parity check on this phone, before anything is shown as the model's output. */
    private suspend fun checkReference(bundle: BundleFiles) {
        val reference = bundle.reference ?: return
        val (passed, summary) = withContext(Dispatchers.Default) {
            openRuntime(bundle).use { runtime ->
                runtime.load()
                referencePasses(reference, runReference(runtime, reference))
            }
        }
        log.append("reference.json: ${if (passed) "ok" else "FAILED"} ($summary)\n")
    }

    /** One turn. ExecuTorch bundles go through its LlmModule (it reads tokenizer.json and the .pte's
     * metadata methods); ONNX bundles through ONNX Runtime GenAI's tokenizer and generator. */
    private suspend fun reply(bundle: BundleFiles, message: String) {
        log.append("> $message\n")
        val prompt = chatPrompt(bundle.chatTemplate, message)
        withContext(Dispatchers.Default) {
            when (bundle.format) {
                "executorch-pte" -> {
                    val module = LlmModule(bundle.artifact.absolutePath, bundle.tokenizer.absolutePath, 0.0f)
                    module.load()
                    module.generate(prompt, bundle.contextLength, object : LlmCallback {
                        override fun onResult(piece: String) { runOnUiThread { log.append(piece) } }
                        override fun onStats(stats: String) { runOnUiThread { log.append("\n[$stats]\n") } }
                    })
                }
                else -> runOnUiThread { log.append(OnnxChat.reply(bundle, prompt) + "\n") }
            }
        }
    }

    /** The bundle's chat template (manifest tokenizer.chat_template) is Jinja, which Android has no
     * engine for: this demo renders the ChatML templates (SmolLM2, Qwen) it recognises by their
     * turn markers and sends any other text as a plain prompt (README.md says so). */
    private fun chatPrompt(template: String?, message: String) =
        if (template != null && "<|im_start|>" in template) "<|im_start|>user\n$message<|im_end|>\n<|im_start|>assistant\n" else message
}
